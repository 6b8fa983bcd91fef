//! Error paths through the SDK's own mocks, for answers an emulator does not give on demand:
//! throttling becomes retry-after (never a hot loop), a name another reconcile just took is
//! retried, and a load balancer that is already gone deletes as success.

use aws_sdk_elasticloadbalancingv2::Client;
use aws_sdk_elasticloadbalancingv2::error::ErrorMetadata;
use aws_sdk_elasticloadbalancingv2::operation::create_load_balancer::CreateLoadBalancerError;
use aws_sdk_elasticloadbalancingv2::operation::describe_load_balancers::DescribeLoadBalancersError;
use aws_sdk_elasticloadbalancingv2::operation::describe_target_groups::DescribeTargetGroupsOutput;
use aws_sdk_elasticloadbalancingv2::types::error::{
    DuplicateLoadBalancerNameException, LoadBalancerNotFoundException,
};
use aws_smithy_mocks::{RuleMode, mock, mock_client};
use portico_aws::error::RETRY_AFTER;
use portico_aws::{AwsProvider, AwsSettings};
use portico_provider::*;

fn spec() -> LoadBalancerSpec {
    let uid = "7c2f-web";
    LoadBalancerSpec {
        name: LoadBalancerName::for_object_uid(uid),
        owner: Ownership {
            cluster_id: "c1".into(),
            object_uid: uid.into(),
            object_ref: "Service/default/web".into(),
        },
        requested_address: None,
        requested_address_name: None,
        source_ranges: vec![],
        frontend: Frontend::Network(NetworkFrontend { listeners: vec![] }),
    }
}

fn aws(client: Client) -> AwsProvider {
    AwsProvider::new(
        client,
        AwsSettings {
            subnets: vec!["subnet-0a".into()],
            vpc_id: Some("vpc-0a".into()),
            ..AwsSettings::default()
        },
    )
}

fn not_found() -> DescribeLoadBalancersError {
    DescribeLoadBalancersError::LoadBalancerNotFoundException(
        LoadBalancerNotFoundException::builder().build(),
    )
}

#[tokio::test]
async fn throttling_asks_to_retry_later_instead_of_failing_hot() {
    let throttled = mock!(Client::describe_load_balancers).then_error(|| {
        DescribeLoadBalancersError::generic(
            ErrorMetadata::builder()
                .code("Throttling")
                .message("Rate exceeded")
                .build(),
        )
    });
    let client = mock_client!(
        aws_sdk_elasticloadbalancingv2,
        RuleMode::MatchAny,
        [&throttled]
    );
    let err = aws(client).ensure(&spec()).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(RETRY_AFTER), "{err}");
    assert!(err.to_string().contains("Rate exceeded"), "{err}");
}

#[tokio::test]
async fn a_name_another_reconcile_just_created_is_retried_not_failed() {
    let absent = mock!(Client::describe_load_balancers).then_error(not_found);
    let taken = mock!(Client::create_load_balancer).then_error(|| {
        CreateLoadBalancerError::DuplicateLoadBalancerNameException(
            DuplicateLoadBalancerNameException::builder()
                .meta(
                    ErrorMetadata::builder()
                        .code("DuplicateLoadBalancerName")
                        .build(),
                )
                .build(),
        )
    });
    let client = mock_client!(
        aws_sdk_elasticloadbalancingv2,
        RuleMode::MatchAny,
        [&absent, &taken]
    );
    let err = aws(client).ensure(&spec()).await.unwrap_err();
    assert!(err.retry_after().is_some(), "{err:?}");
}

#[tokio::test]
async fn deleting_a_load_balancer_that_is_already_gone_succeeds() {
    let absent = mock!(Client::describe_load_balancers).then_error(not_found);
    let no_groups = mock!(Client::describe_target_groups)
        .then_output(|| DescribeTargetGroupsOutput::builder().build());
    let client = mock_client!(
        aws_sdk_elasticloadbalancingv2,
        RuleMode::MatchAny,
        [&absent, &no_groups]
    );
    let s = spec();
    aws(client)
        .delete(&s.name, &s.owner)
        .await
        .expect("nothing to delete is success");
}
